"""How results are measured: perplexity (simulated and through each row's cache), KL divergence,
passkey retrieval, the classic quantizers and library caches beside kvquant's, lm-evaluation-harness."""

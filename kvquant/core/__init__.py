"""The math, numpy and torch only (no transformers): densities, scalar codebooks and their design for
products, pair statistics, group scales, the quantizer every path runs, bit packing and allocation."""

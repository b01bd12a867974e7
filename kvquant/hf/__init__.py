"""The transformers adapter: the one attention function (registered with ``AttentionInterface``),
``wrap``/``unwrap``, calibration, several processes, device placement, version differences."""

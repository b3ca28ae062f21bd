"""ml_collections experiment configs: get_config(arg) with tiny and paper variants."""

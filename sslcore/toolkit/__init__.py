"""What methods share: heads, momentum targets (EMA), collectives that work with one process or many, LARS,
split batch norm, image decoding."""

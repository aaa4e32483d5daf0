"""The modelling code of the tiny MoonDream2-style remote-code checkpoint (`remote_code.build_tiny_remote_code`).

These two files are copied into the checkpoint folder, next to its `config.json` (`auto_map`) and weights, and
run from there by transformers' `trust_remote_code` loader, as a hub checkpoint's own code is. nightread never
imports them to answer; the builder imports them only to create the random weights.
"""

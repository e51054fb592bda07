"""opt_hooks: audit SAE features against first-order optimality conditions."""

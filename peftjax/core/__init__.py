"""The machinery every method shares: paths, injection, labels, counting."""

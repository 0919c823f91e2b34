"""One module per paper's protocol. Each uses the core, the data readers and the mechanisms, and
never another experiment module."""

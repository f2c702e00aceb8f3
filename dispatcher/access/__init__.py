"""Who may do what: accounts, the owners of files and LoRAs, per-user limits, the dashboard token."""

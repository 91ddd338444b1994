"""kvserve: the HTTP server, its engine and its settings."""
VERSION = "0.1.0"

"""Networking adapters: ZeroMQ bus, discovery, broker, sync protocol."""

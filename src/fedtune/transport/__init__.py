"""Transports carry instructions to clients and replies back. Strategy code never imports them."""

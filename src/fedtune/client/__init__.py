"""The participant side: local training and evaluation on data that never leaves the client."""

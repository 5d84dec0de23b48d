"""The replica workers of each call: train, evaluate and predict."""

"""The swarm as a network: DHT start-up and identity, the config check, signed per-peer DHT records, contribution
records and the counters behind them."""

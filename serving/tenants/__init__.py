"""Tenants (teams) and their named API keys: who is calling, and which tiers they may use."""

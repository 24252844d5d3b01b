"""Who is out there and what they can do: signed peer records, gossip, failure detection."""

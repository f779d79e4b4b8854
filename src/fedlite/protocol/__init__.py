"""The wire protocol shared by agents and aggregators: topics, message schema, codec."""

PROTOCOL_VERSION = 2

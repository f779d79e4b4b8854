"""Mosquitto broker configuration for fedlite: conf, users, ACL, test certificates, a supervised broker."""

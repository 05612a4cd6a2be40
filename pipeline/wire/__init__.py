"""What travels between processes: message frames, ZeroMQ endpoints and CURVE keys, sockets, MQTT links."""

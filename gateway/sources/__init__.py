"""Alert sources: MQTT, serial lines."""

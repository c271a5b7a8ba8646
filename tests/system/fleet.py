"""What the system tests feed a gateway with, and how they read what it sent: the
config a test device gets, MQTT publishing to the host's broker, mail at the smarthost."""

from __future__ import annotations

import threading

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from tests.parts import Mosquitto, SmtpServer, wait_for

USER, PASSWORD = "gw@box.example", "box-secret-1"
TTY = "/run/mailgw-test/tty"

SERIAL = """
[[serial]]
port = "{tty}"
name = "sim"
"""

CONFIG = """\
[gateway]
device_id = "box"
default_route = "ops"

[smtp]
host = "localhost"
port = {smtp_port}
tls = "starttls"
from = "mailgw@box.example"
username = "{user}"{password}
ca_file = "/etc/mailgw/ca.pem"
min_backoff = "1s"
probe_max = "2s"

[mqtt]
host = "127.0.0.1"
port = {mqtt_port}
topics = ["alerts/#"]
{serial}
[[route]]
name = "ops"
match = "#"
to = ["ops@box.example"]
"""


def config(smtp: SmtpServer, broker: Mosquitto, serial: bool = True, password: bool = False) -> str:
    """The device's gateway.toml: the host's smarthost (STARTTLS, AUTH) and broker; with
    `password`, the SMTP password in it, as a first-boot file on the card may have it."""
    return CONFIG.format(
        smtp_port=smtp.port,
        mqtt_port=broker.port,
        user=USER,
        password=f'\npassword = "{PASSWORD}"' if password else "",
        serial=SERIAL.format(tty=TTY) if serial else "",
    )


def publish(broker: Mosquitto, texts: list[str], pace: float = 0.0) -> None:
    client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2)
    client.connect("127.0.0.1", broker.port)
    client.loop_start()
    try:
        for text in texts:
            info = client.publish("alerts/box/door", text, qos=1)
            info.wait_for_publish(10)  # the broker's PUBACK
            if pace:
                threading.Event().wait(pace)
    finally:
        client.disconnect()
        client.loop_stop()


def subjects(smtp: SmtpServer) -> list[str]:
    return [str(r.message["Subject"]) for r in smtp.received]


def arrived(smtp: SmtpServer, texts: list[str], timeout: float = 60) -> None:
    def all_there() -> bool:
        got = " ".join(subjects(smtp))
        return all(t in got for t in texts)

    wait_for(all_there, timeout, f"{len(texts)} mails at the smarthost")

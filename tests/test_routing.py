from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.alert import Draft, Severity, normalize
from gateway.config import RouteSection
from gateway.routing import Router, render, topic_matches


@pytest.mark.parametrize(
    ("flt", "topic", "expected"),
    [
        ("alerts/#", "alerts/a/b", True),
        ("alerts/#", "alerts", True),  # '#' also matches the parent level (§4.7.1.2)
        ("alerts/+", "alerts/a", True),
        ("alerts/+", "alerts/a/b", False),
        ("alerts/+/temp", "alerts/x/temp", True),
        ("+/+", "a/b", True),
        ("a/b", "a/b", True),
        ("a/b", "a/c", False),
        ("#", "$SYS/broker", False),
        ("+/broker", "$SYS/broker", False),
        ("$SYS/#", "$SYS/broker", True),
        ("a/+", "a/", True),
    ],
)
def test_topic_matches(flt: str, topic: str, expected: bool) -> None:
    assert topic_matches(flt, topic) is expected


@given(st.lists(st.text(alphabet="abc", min_size=1, max_size=3), min_size=1, max_size=5))
def test_hash_matches_everything_and_exact_matches_itself(levels: list[str]) -> None:
    topic = "/".join(levels)
    assert topic_matches("#", topic)
    assert topic_matches(topic, topic)
    assert topic_matches("/".join("+" for _ in levels), topic)


def test_render_is_safe_substitution() -> None:
    values = {"sensor": "t1", "message": "{sensor} {__class__}"}
    assert render("[{sensor}] {message}", values) == "[t1] {sensor} {__class__}"
    assert render("{missing} {{literal}}", values) == "<no missing> {literal}"
    assert render("{message.__class__} {0}", values) == "{message.__class__} {0}"


def test_router_priorities_and_default() -> None:
    routes = [
        RouteSection(name="ops", match="alerts/#", to=("ops@x.y",), min_severity="warning"),
        RouteSection(name="all", match="#", to=("log@x.y",), min_severity="debug", priority=0),
    ]
    router = Router(routes)
    crit = normalize(b"x", Draft("alerts/a", "mqtt", "s", Severity.CRITICAL))
    assert router.route(crit) == (("ops", 3), ("all", 0))
    info = normalize(b"x", Draft("alerts/a", "mqtt", "s", Severity.INFO))
    assert router.route(info) == (("all", 0),)
    only_ops = Router(routes[:1], default_route="ops")
    assert only_ops.route(normalize(b"x", Draft("other", "local", "s", Severity.DEBUG))) == (
        ("ops", 0),
    )
    assert Router(routes[:1]).route(normalize(b"x", Draft("other", "local", "s"))) == ()

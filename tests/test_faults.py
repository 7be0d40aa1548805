"""facediffuser/faults.py, the one test-only fault mechanism: off unless named, parsed strictly, armed in-process."""

from __future__ import annotations

import pytest

from facediffuser import faults


@pytest.fixture(autouse=True)
def clean(monkeypatch):
    monkeypatch.delenv(faults.ENV, raising=False)
    faults.disarm()
    yield
    faults.disarm()


def test_off_unless_named(monkeypatch):
    assert faults.armed("train.step") is None and faults.armed_int("evaluate.stop_after") is None
    faults.fire("train.step")  # nothing armed: nothing happens
    faults.fire("preprocess.segment", "a.jpg")
    assert faults.forwarded_env() == {}
    monkeypatch.setenv(faults.ENV, "")
    faults.fire("train.step")
    assert faults.forwarded_env() == {}


def test_the_variable_names_points_and_values(monkeypatch):
    assert faults.parse(" train.step=3, train.marker=/tmp/m ,preprocess.segment=faulty.jpg,") == {
        "train.step": "3",
        "train.marker": "/tmp/m",
        "preprocess.segment": "faulty.jpg",
    }
    monkeypatch.setenv(faults.ENV, "preprocess.segment=faulty.jpg,evaluate.stop_after=10")
    assert faults.armed("preprocess.segment") == "faulty.jpg" and faults.armed_int("evaluate.stop_after") == 10
    assert faults.armed("preprocess.detect") is None
    faults.fire("preprocess.segment", "other.jpg")  # another item: nothing
    with pytest.raises(faults.InjectedFault, match=r"preprocess\.segment=faulty\.jpg") as raised:
        faults.fire("preprocess.segment", "faulty.jpg")
    assert isinstance(raised.value, RuntimeError) and not isinstance(raised.value, ValueError)
    with pytest.raises(faults.InjectedFault):  # an environment point keeps firing
        faults.fire("preprocess.segment", "faulty.jpg")
    assert faults.forwarded_env() == {faults.ENV: "preprocess.segment=faulty.jpg,evaluate.stop_after=10"}


@pytest.mark.parametrize(
    "text, message",
    [
        ("train.step", "'train.step' is not point=value"),
        ("train.step=", "'train.step=' is not point=value"),
        ("=3", "'=3' is not point=value"),
        ("train.steps=3", "unknown fault point 'train.steps'; the points are preprocess.STAGE, train.step"),
        ("preprocess.=x", "unknown fault point 'preprocess.'"),
    ],
)
def test_a_malformed_variable_is_a_clear_error(monkeypatch, text, message):
    with pytest.raises(ValueError, match=f"^FACEDIFFUSER_FAULTS: {message}"):
        faults.parse(text)
    monkeypatch.setenv(faults.ENV, text)
    with pytest.raises(ValueError, match="FACEDIFFUSER_FAULTS"):  # at the first check, not silently off
        faults.fire("train.step")


def test_a_count_must_be_a_number(monkeypatch):
    monkeypatch.setenv(faults.ENV, "evaluate.stop_after=ten")
    with pytest.raises(ValueError, match="evaluate.stop_after='ten' must be an integer"):
        faults.armed_int("evaluate.stop_after")


def test_arm_in_process_once_and_disarm(monkeypatch):
    with pytest.raises(ValueError, match="unknown fault point 'serve.nothing'"):
        faults.arm("serve.nothing")
    faults.arm("serve.sampler")
    assert faults.forwarded_env() == {}  # arms stay in this process
    with pytest.raises(faults.InjectedFault, match="serve.sampler=RuntimeError"):
        faults.fire("serve.sampler", once=True)
    faults.fire("serve.sampler", once=True)  # once: disarmed by firing
    faults.arm("serve.encoder", "ValueError")
    with pytest.raises(ValueError) as raised:  # the ValueError kind is both
        faults.fire("serve.encoder", once=True)
    assert isinstance(raised.value, faults.InjectedFault)
    monkeypatch.setenv(faults.ENV, "train.step=3")
    faults.arm("train.step", "5")  # an arm here wins over the environment
    assert faults.armed_int("train.step") == 5
    faults.disarm("train.step")
    assert faults.armed_int("train.step") == 3
    faults.arm("serve.sampler")
    faults.disarm()
    assert faults.armed("serve.sampler") is None

"""The settings reach the DIMSE server through one projection, with one definition of
each default: a field added to either side without the other fails here."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

from filmless.settings import Settings, load_settings
from filmless.wiring import NOT_SETTINGS, dimse_config
from pacs.dimse.server import DimseConfig

# DimseConfig fields whose setting has another name or shape.
CONVERTED = {"port", "allowed_calling_aets", "calling_aets_by_network", "move_destinations"}


def test_every_server_field_comes_from_a_setting() -> None:
    for field in fields(DimseConfig):
        if field.name in NOT_SETTINGS or field.name in CONVERTED:
            continue
        assert field.name in Settings.model_fields, field.name


def test_the_defaults_are_the_servers(tmp_path: Path) -> None:
    assert dimse_config(load_settings(data_dir=tmp_path)) == DimseConfig()


def test_each_setting_arrives(tmp_path: Path) -> None:
    settings = load_settings(
        data_dir=tmp_path,
        max_associations=7,
        max_find_matches=11,
        handshake_timeout=2.5,
        dimse_port=4242,
        allowed_calling_aets=["CT1"],
        calling_aets_by_network={"10.1.0.0/16": ["CT1"]},
        move_destinations={"VIEWER": "127.0.0.1:11113"},
    )
    config = dimse_config(settings)
    assert (config.max_associations, config.max_find_matches, config.handshake_timeout) == (
        7,
        11,
        2.5,
    )
    assert config.port == 4242
    assert config.allowed_calling_aets == ("CT1",)
    assert config.calling_aets_by_network == (("10.1.0.0/16", ("CT1",)),)
    assert config.move_destinations == (("VIEWER", "127.0.0.1", 11113),)

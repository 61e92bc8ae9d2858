"""The settings reach the DIMSE server through one projection, with one definition of
each default: a field added to either side without the other fails here."""

from __future__ import annotations

import inspect
from dataclasses import fields
from pathlib import Path

from dicomweb.app import create_app
from filmless.settings import Settings, load_settings
from filmless.wiring import NOT_SETTINGS, dimse_config
from inference.worker import WorkerSettings
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


def test_the_other_parts_default_to_the_settings(tmp_path: Path) -> None:
    """The DICOMweb app and the screening worker are built from the settings, field by
    field (filmless.app, filmless.wiring); their own defaults, used by tests and
    embedders, must say the same."""
    settings = load_settings(data_dir=tmp_path)
    app = {n: p.default for n, p in inspect.signature(create_app).parameters.items()}
    assert app["max_results"] == settings.max_find_matches
    assert app["max_query_keys"] == settings.max_query_keys
    assert app["case_insensitive_names"] == settings.case_insensitive_names
    worker = WorkerSettings()
    assert list(worker.providers) == settings.inference_providers
    assert (worker.threads, worker.runs) == (settings.inference_threads, settings.inference_runs)
    assert worker.max_batch == settings.inference_max_batch
    assert worker.max_wait_ms == settings.inference_max_wait_ms
    assert worker.max_attempts == settings.job_max_attempts
    assert worker.ae_title == settings.ae_title

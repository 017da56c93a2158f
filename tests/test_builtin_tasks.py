"""Checks on the built-in TA8 zero-shot metadata (engine/data/builtin_tasks.json)."""

import json

import pytest

from engine.builtin_tasks import DATA_PATH, BuiltinTask, builtin_task_names, find_builtin_task

pytestmark = pytest.mark.fast

EXPECTED_COUNTS = {
    "sun397": 397,
    "stanford-cars": 196,
    "resisc45": 45,
    "eurosat": 10,
    "svhn": 10,
    "gtsrb": 43,
    "mnist": 10,
    "dtd": 47,
}


def test_names_are_the_ta8_set_in_order():
    assert builtin_task_names() == list(EXPECTED_COUNTS)


def test_json_header_and_keys():
    doc = json.loads(DATA_PATH.read_text(encoding="utf-8"))
    assert doc["format"] == "merge-explorer-builtin-tasks"
    assert doc["version"] == 1
    assert set(doc["tasks"]) == set(EXPECTED_COUNTS)
    for name, entry in doc["tasks"].items():
        assert entry["source"].strip(), name
        if "folder_names" in entry:
            assert len(entry["folder_names"]) == len(entry["classes"]), name


@pytest.mark.parametrize("name,count", EXPECTED_COUNTS.items())
def test_class_counts(name, count):
    task = find_builtin_task(name)
    assert isinstance(task, BuiltinTask)
    assert task.name == name
    assert len(task.classes) == count


@pytest.mark.parametrize("name", EXPECTED_COUNTS)
def test_no_duplicate_or_blank_classes(name):
    classes = find_builtin_task(name).classes
    assert len(set(classes)) == len(classes)
    assert all(c.strip() == c and c for c in classes)


@pytest.mark.parametrize("name", EXPECTED_COUNTS)
def test_templates_have_one_placeholder(name):
    templates = find_builtin_task(name).templates
    assert templates
    for t in templates:
        assert t.count("{}") == 1, t
        assert t.format("x")  # formats cleanly: no other braces


@pytest.mark.parametrize(
    "query,expected",
    [
        ("cars", "stanford-cars"),
        ("Stanford_Cars", "stanford-cars"),
        ("stanfordcars", "stanford-cars"),
        ("STANFORD-CARS", "stanford-cars"),
        ("SUN397", "sun397"),
        ("sun", "sun397"),
        ("EuroSAT", "eurosat"),
        ("tanganke/eurosat", "eurosat"),
        ("RESISC45", "resisc45"),
        ("nwpu_resisc45", "resisc45"),
        ("GTSRB", "gtsrb"),
        ("  dtd ", "dtd"),
        ("MNIST", "mnist"),
        ("svhn", "svhn"),
    ],
)
def test_aliases_resolve(query, expected):
    task = find_builtin_task(query)
    assert task is not None and task.name == expected


@pytest.mark.parametrize("query", ["imagenet", "cifar10", "", "   ", "car", "sun-39"])
def test_unknown_names_give_none(query):
    assert find_builtin_task(query) is None


def test_aliases_do_not_collide():
    seen = {}
    for name in builtin_task_names():
        task = find_builtin_task(name)
        for alias in (name, *task.aliases):
            assert find_builtin_task(alias).name == name
            seen.setdefault(alias.casefold(), name)
    assert len(seen) >= len(EXPECTED_COUNTS)


def test_eurosat_order():
    classes = find_builtin_task("eurosat").classes
    assert classes[0] == "annual crop land"
    assert classes[1] == "forest"
    assert classes[2] == "brushland or shrubland"
    assert classes[-1] == "lake or sea"
    doc = json.loads(DATA_PATH.read_text(encoding="utf-8"))
    folders = doc["tasks"]["eurosat"]["folder_names"]
    assert folders == sorted(folders)
    assert folders[0] == "AnnualCrop" and folders[-1] == "SeaLake"


def test_digit_tasks_in_numeric_order():
    digits = tuple(str(i) for i in range(10))
    assert find_builtin_task("mnist").classes == digits
    assert find_builtin_task("svhn").classes == digits


def test_gtsrb_order_spot_checks():
    classes = find_builtin_task("gtsrb").classes
    assert classes[0] == "red and white circle 20 kph speed limit"
    assert classes[14] == "stop"
    assert classes[-1] == "white circle with gray strike bar indicating no passing for trucks has ended"


def test_dtd_and_resisc45_are_sorted_folder_order():
    dtd = find_builtin_task("dtd").classes
    assert list(dtd) == sorted(dtd)
    assert dtd[0] == "banded" and dtd[-1] == "zigzagged"
    doc = json.loads(DATA_PATH.read_text(encoding="utf-8"))
    folders = doc["tasks"]["resisc45"]["folder_names"]
    assert folders == sorted(folders)
    assert find_builtin_task("resisc45").classes == tuple(f.replace("_", " ") for f in folders)


def test_sun397_and_cars_spot_checks():
    sun = find_builtin_task("sun397").classes
    assert sun[0] == "abbey" and sun[1] == "airplane cabin" and sun[-1] == "youth hostel"
    cars = find_builtin_task("stanford-cars").classes
    # devkit order, not alphabetical: Acura RL comes before Acura Integra
    assert cars[0] == "AM General Hummer SUV 2000"
    assert cars[1] == "Acura RL Sedan 2012"
    assert cars[5] == "Acura Integra Type R 2001"
    assert cars[-1] == "smart fortwo Convertible 2012"


def test_no_torch_or_streamlit_import():
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import sys, engine.builtin_tasks as b; b.find_builtin_task('dtd'); "
        "print(any(m in sys.modules for m in ('torch', 'streamlit')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert out.stdout.strip() == "False"

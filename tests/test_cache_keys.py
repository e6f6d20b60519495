"""Stage code versions come from the stage's transitive imports, never from a hand-kept module list:
a change anywhere a stage reaches changes its key; a change elsewhere does not."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tasks import workspace
from tasks.render import RenderOptions, engine_roots
from tasks.workspace import PROJECT_PACKAGES, code_version, reached_modules, stage_cache

ROOT = Path(workspace.__file__).resolve().parents[1]
RENDER_ROOTS = ("tasks.render", "engine.multitalk.renderer")  # the render stage asking for multitalk


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A private copy of the project's packages that the tests may edit; keys are computed from it."""
    for package in PROJECT_PACKAGES:
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(workspace, "_PROJECT_ROOT", tmp_path)
    _clear()
    yield tmp_path
    _clear()


def _clear():
    code_version.cache_clear()
    reached_modules.cache_clear()


def _touch(root: Path, module: str) -> None:
    """Change one constant in `module`'s source."""
    path = root.joinpath(*module.split("."))
    path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    path.write_text(path.read_text() + "\n_CACHE_KEY_TEST_CONSTANT = 2\n")
    _clear()


def test_the_render_key_reaches_what_the_old_list_missed():
    project, external = reached_modules(*RENDER_ROOTS)
    # the hand-kept list left these out: defaults filled in by validation, the WAV writer of the media layer
    assert {"engine.multitalk.validation", "engine.media", "engine.multitalk.conditioning"} <= set(project)
    assert {"torch", "diffusers", "transformers", "numpy"} <= set(external)
    assert "engine.preview" not in project and "tasks.remix" not in project


@pytest.mark.parametrize("module", reached_modules(*RENDER_ROOTS)[0])
def test_a_change_in_any_reached_module_changes_the_render_key(project, module):
    before = code_version(*RENDER_ROOTS)
    _touch(project, module)
    assert code_version(*RENDER_ROOTS) != before, module


@pytest.mark.parametrize("module", ["tasks.remix", "flows.cli", "engine.preview", "tasks.deliver"])
def test_a_change_elsewhere_leaves_the_render_key(project, module):
    before = code_version(*RENDER_ROOTS)
    _touch(project, module)
    assert code_version(*RENDER_ROOTS) == before, module


def test_third_party_versions_are_part_of_the_key(project, monkeypatch):
    before = code_version(*RENDER_ROOTS)
    real = workspace._package_version
    monkeypatch.setattr(workspace, "_package_version", lambda top: "9.9" if top == "torch" else real(top))
    _clear()
    assert code_version(*RENDER_ROOTS) != before
    monkeypatch.setattr(workspace, "_package_version", lambda top: "9.9" if top == "prefect" else real(top))
    _clear()
    assert code_version(*RENDER_ROOTS) == before  # orchestration cannot change a render: no re-render


def test_lazy_and_relative_imports_are_followed(tmp_path, monkeypatch):
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "__init__.py").write_text("")
    (tmp_path / "tasks" / "stage.py").write_text(
        "def run():\n    from .helper import VALUE\n    return VALUE\n"
    )
    (tmp_path / "tasks" / "helper.py").write_text("VALUE = 1\n")
    monkeypatch.setattr(workspace, "_PROJECT_ROOT", tmp_path)
    _clear()
    assert reached_modules("tasks.stage")[0] == ("tasks", "tasks.helper", "tasks.stage")
    _clear()


def test_the_render_policy_keys_each_engine_by_its_own_code(project):
    options = {"options": RenderOptions("preview", 480, 8, 7, "", 5.0, 4.0)}
    assert engine_roots(options) == ("engine.preview",)
    policy = stage_cache("tasks.render", roots_for=engine_roots)
    preview_version = code_version(*policy.modules, *engine_roots(options))
    _touch(project, "engine.multitalk.pipeline")
    assert code_version(*policy.modules, *engine_roots(options)) == preview_version
    _touch(project, "engine.preview")
    assert code_version(*policy.modules, *engine_roots(options)) != preview_version


def test_an_unknown_stage_module_is_an_error():
    with pytest.raises(ModuleNotFoundError, match="tasks.nope"):
        code_version("tasks.nope")


def test_the_episode_flow_does_not_import_what_starts_it() -> None:
    """flows/workers.py starts episode flows; the flow reaches the Dask slot through flows/placement.py only."""
    project, _ = reached_modules("flows.episode")
    assert "flows.workers" not in project and "flows.placement" in project

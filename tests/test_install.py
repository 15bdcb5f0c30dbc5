"""Packaging: `pip install .` (a built wheel) and `pip install -e .` both give working `longtrain.*` imports."""
import os
import subprocess
import sys
import zipfile

import pytest

IMPORT_CHECK = (
    "import longtrain, longtrain.models, longtrain.parallel, longtrain.kernels, longtrain.config, longtrain.cli;"
    "print(longtrain.models.__file__); print(longtrain.kernels.__file__)"
)


def test_wheel_installs_mapped_packages(repo_root, tmp_path):
    wheel_dir, target = tmp_path / "wheel", tmp_path / "site"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", repo_root, "--no-deps", "--no-build-isolation", "-q", "-w",
         str(wheel_dir)], capture_output=True, text=True, timeout=300,
    )
    assert build.returncode == 0, build.stderr
    (wheel,) = wheel_dir.glob("longtrain-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for package in ("longtrain", "longtrain/models", "longtrain/parallel", "longtrain/kernels"):
        assert f"{package}/__init__.py" in names, f"{package} missing from the wheel"
    assert not any(n.startswith(("models/", "kernels/", "parallel/", "tests/")) for n in names)
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        capture_output=True, text=True, timeout=300,
    )
    assert install.returncode == 0, install.stderr
    env = {**os.environ, "PYTHONPATH": str(target)}
    out = subprocess.run([sys.executable, "-c", IMPORT_CHECK], capture_output=True, text=True, cwd=tmp_path,
                         env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    for line in out.stdout.split():
        assert line.startswith(str(target)), f"imported {line}, not the installed wheel"


def test_imports_work_outside_the_repo(repo_root, tmp_path):
    """Whatever install this environment has (CI uses `pip install -e .`), imports work from another folder
    and resolve to the mapped folders of this checkout or an installed copy."""
    out = subprocess.run([sys.executable, "-c", IMPORT_CHECK], capture_output=True, text=True, cwd=tmp_path,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    models_file, kernels_file = out.stdout.split()
    if models_file.startswith(repo_root):  # editable install: longtrain.models must be models/ on disk
        assert models_file == os.path.join(repo_root, "models", "__init__.py")
        assert kernels_file == os.path.join(repo_root, "kernels", "__init__.py")
    else:
        assert os.sep + os.path.join("longtrain", "models") in models_file


def _run_in_repo_root(repo_root, code, **env):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=repo_root,
                          env={**os.environ, **env}, timeout=300)


def test_repo_folders_do_not_shadow_packages_of_the_same_name(repo_root, tmp_path):
    """Python started in the repo root has the root first on sys.path; `import kernels` (as transformers does for
    Hugging Face's `kernels`) must still get the installed package of that name, not our `kernels/` folder."""
    site = tmp_path / "site"
    for name in ("kernels", "models"):
        (site / name).mkdir(parents=True)
        (site / name / "__init__.py").write_text(f"WHO = 'other {name}'\nfrom . import sub\n")
        (site / name / "sub.py").write_text("X = 1\n")
    out = _run_in_repo_root(repo_root, "import kernels, models, kernels.sub, longtrain.kernels as ours;"
                                       "print(kernels.WHO, models.WHO, kernels.sub.X, ours.__name__)",
                            PYTHONPATH=str(site))
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["other", "kernels", "other", "models", "1", "longtrain.kernels"]


def test_bare_import_of_a_repo_folder_names_the_longtrain_package(repo_root):
    out = _run_in_repo_root(repo_root, "import parallel")
    assert out.returncode != 0
    assert "ModuleNotFoundError: No module named 'parallel'" in out.stderr
    assert "longtrain.parallel" in out.stderr


def test_transformers_model_classes_import_from_the_repo_root(repo_root):
    pytest.importorskip("transformers")
    out = _run_in_repo_root(repo_root, "from transformers import AutoModelForCausalLM, LlamaForCausalLM, "
                                       "MiniMaxForCausalLM; print('ok')")
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "ok"


def test_every_dependency_has_a_floor_and_a_ceiling(repo_root):
    """A new major (or 0.x minor) release of a dependency must not reach a fresh install untested: every
    requirement, extras included, carries a lower and an upper bound or an exact pin."""
    import tomllib

    project = tomllib.load(open(os.path.join(repo_root, "pyproject.toml"), "rb"))["project"]
    requirements = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        requirements += [r for r in extra if not r.startswith("longtrain")]
    unbounded = [r for r in requirements if "==" not in r and not (">=" in r and "<" in r.replace("<=", "@"))]
    assert not unbounded, f"requirements without both bounds: {unbounded}"

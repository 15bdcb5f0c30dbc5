"""Packaging: `pip install .` (a built wheel) and `pip install -e .` both give working `longtrain.*` imports."""
import os
import subprocess
import sys
import zipfile

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

"""Package list for the on-disk layout of DESIGN.md §1.

models/, parallel/ and kernels/ sit at the top level but install as longtrain.models, longtrain.parallel and
longtrain.kernels. setuptools' automatic discovery cannot express that mapping for subpackages, so we derive the
package list from the mapped roots here; everything else lives in pyproject.toml.
"""
from setuptools import find_packages, setup

PACKAGE_ROOTS = {
    "longtrain": "longtrain",
    "longtrain.models": "models",
    "longtrain.parallel": "parallel",
    "longtrain.kernels": "kernels",
}

packages = []
for name, directory in PACKAGE_ROOTS.items():
    packages.append(name)
    packages += [f"{name}.{sub}" for sub in find_packages(directory)]

setup(packages=packages, package_dir=PACKAGE_ROOTS, include_package_data=False)

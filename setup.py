# The Python module kqsvd: the header-only library compiled once for Python with pybind11.
#   python3 -m venv --system-site-packages .venv && .venv/bin/pip install --no-build-isolation --no-index .
# (Debian 12: python3-pybind11, pybind11-dev, python3-numpy, python3-setuptools, python3-wheel, libeigen3-dev,
# nlohmann-json3-dev; no package index is used.)
import os
import re
import subprocess

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

here = os.path.dirname(os.path.abspath(__file__))


def version():
    with open(os.path.join(here, "include", "kqsvd", "version.hpp")) as f:
        return re.search(r'version_string = "([^"]+)"', f.read()).group(1)


def eigen_include():
    try:
        return subprocess.check_output(["pkg-config", "--cflags-only-I", "eigen3"], text=True).strip()[2:]
    except (OSError, subprocess.CalledProcessError):
        return "/usr/include/eigen3"


setup(
    name="kqsvd",
    version=version(),
    description="KQ-SVD low-rank KV caches: calibration Grams, closed-form projections, quantized caches",
    license="MIT",
    packages=["kqsvd"],
    package_dir={"": "python"},
    package_data={"kqsvd": ["__init__.pyi", "py.typed"]},
    ext_modules=[
        Pybind11Extension(
            "kqsvd._core",
            ["python/kqsvd_module.cpp"],
            include_dirs=[os.path.join(here, "include"), os.path.join(here, "reference", "include"), eigen_include()],
            cxx_std=17,
            extra_compile_args=["-O2", "-Wall", "-Wextra"],
        )
    ],
    cmdclass={"build_ext": build_ext},
    python_requires=">=3.9",
    install_requires=["numpy"],
    zip_safe=False,
)

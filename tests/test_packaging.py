"""pyproject.toml installs everywhere the project runs: its TensorFlow requirement picks exactly one
distribution per platform, tensorflow-cpu where that has wheels (Linux x86_64), tensorflow elsewhere."""
import os
import sys

import pytest
from packaging.requirements import Requirement

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser as a package, a dependency of pytest there
    import tomli as tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TENSORFLOW_BUILDS = ("tensorflow", "tensorflow-cpu")
PLATFORMS = {  # the environment markers of each platform, as packaging.markers names them
    "linux x86_64": {"sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64"},
    "linux aarch64": {"sys_platform": "linux", "platform_system": "Linux", "platform_machine": "aarch64"},
    "macos arm64": {"sys_platform": "darwin", "platform_system": "Darwin", "platform_machine": "arm64"},
    "macos x86_64": {"sys_platform": "darwin", "platform_system": "Darwin", "platform_machine": "x86_64"},
    "windows amd64": {"sys_platform": "win32", "platform_system": "Windows", "platform_machine": "AMD64"},
}
EXPECTED = {"linux x86_64": "tensorflow-cpu", "linux aarch64": "tensorflow", "macos arm64": "tensorflow",
            "macos x86_64": "tensorflow", "windows amd64": "tensorflow"}


def dependencies():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as handle:
        return [Requirement(text) for text in tomllib.load(handle)["project"]["dependencies"]]


@pytest.mark.parametrize("platform", list(PLATFORMS))
def test_one_tensorflow_distribution_per_platform(platform):
    environment = PLATFORMS[platform]
    chosen = [requirement.name for requirement in dependencies() if requirement.name in TENSORFLOW_BUILDS
              and (requirement.marker is None or requirement.marker.evaluate(environment))]
    assert chosen == [EXPECTED[platform]], (platform, chosen)


def test_every_other_dependency_is_for_every_platform():
    conditional = [str(requirement) for requirement in dependencies()
                   if requirement.marker is not None and requirement.name not in TENSORFLOW_BUILDS]
    assert not conditional

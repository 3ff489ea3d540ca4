"""One version number: the library's (``robustmri.__version__``, the package's) is the bundle's."""

import json
import tomllib

import robustmri
from conftest import BUNDLE, ROOT


def test_the_library_package_and_bundle_share_one_version():
    package = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    metadata = json.loads((BUNDLE / "configs" / "metadata.json").read_text())
    versions = {"robustmri.__version__": robustmri.__version__, "pyproject.toml version": package,
                "metadata.json version": metadata["version"],
                "metadata.json required_packages_version.robustmri": metadata["required_packages_version"]["robustmri"]}
    assert len(set(versions.values())) == 1, versions

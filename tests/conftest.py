import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: real-weight tests (minutes); run in CI")
    config.addinivalue_line("markers", "arm64: the phone side under arm64 emulation (root)")


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """``exported(kind, family="llama", mode="lora", variants=(1, 2), accumulation=1)`` ->
    (recipe, bundle dir): a tiny bundle ("mono" or "sharded") of a prime-sized random model
    (``tests.tiny.tiny_recipe``) with GPT-2's tokenizer, exported once per session and
    shared by every test that asks for it."""
    root = tmp_path_factory.mktemp("exported")
    cache = {}

    def get(kind: str = "mono", family: str = "llama", mode: str = "lora", variants=(1, 2),
            accumulation: int = 1, verify: bool = False):
        key = (kind, family, mode, tuple(variants), accumulation)
        if key not in cache:
            from export.monolithic_bundle import export_bundle
            from export.sharded_bundle import export_sharded
            from tests.tiny import tiny_recipe
            d = root / "-".join(map(str, (kind, family, mode, *variants, accumulation)))
            recipe = tiny_recipe(d / "model", family, mode, micro_batch=max(variants),
                                 accumulation=accumulation)
            export = export_bundle if kind == "mono" else export_sharded
            export(recipe, d / "bundle", variants, verify=verify)
            cache[key] = (recipe, d / "bundle")
        return cache[key]
    return get

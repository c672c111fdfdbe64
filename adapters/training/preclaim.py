"""What ``train`` checks before it claims the run folder: every refusal that needs neither the model nor the data
stage, so a refused run leaves nothing behind and costs no load (RELIABILITY row 42).

Recipe values (types, ranges, counts) were checked when the recipe was read (config/); here: the trackers named in
``report_to``, the streaming restrictions, that each local data source is there, and ``init_adapter`` (it resolves,
its file is whole, its LoRA config is the recipe's). What needs the model or the rows (the base fingerprint, the
preflight on the model's config, a row that cannot be encoded) is checked after the claim; a refusal there removes
the folder the claim created (lifecycle.remove_unborn).
"""

from __future__ import annotations

from adapters.config import Recipe


def check_before_claim(recipe: Recipe) -> None:
    from adapters.training.callbacks import check_report_to

    check_report_to(recipe.report_to)
    if recipe.streaming:
        from adapters.data.streaming import check_streaming

        check_streaming(recipe)
    _data_sources(recipe)
    if recipe.init_adapter:
        from adapters.model.lora import check_init_adapter

        check_init_adapter(recipe)


def _data_sources(recipe: Recipe) -> None:
    """Each local source is a file, a folder of data files or a saved dataset; hub ids are left to the loader."""
    from adapters.data.cache import data_files
    from adapters.data.readers import is_dataset_source, source_files

    for path in data_files(recipe):
        if not is_dataset_source(path, recipe.data_split):
            source_files(path)  # DataError: "<path>: no such file or directory"

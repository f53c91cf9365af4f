"""The data layer: shard formats, converters, generated sample sets, transforms and loaders.

Modules: ``shards`` (tar shard format, ``_info.json``), ``categories`` (COCO id <-> contiguous
label), ``convert`` (ImageFolder / COCO -> shards), ``samples`` (generated sample sets),
``transforms`` (joint image + target augmentation), ``collate`` (padding + padding mask),
``stream`` (resumable resampled shard streams), ``classification`` and ``detection`` (loaders).
Nothing is imported here so that ``import pipeline.data`` stays cheap.
"""

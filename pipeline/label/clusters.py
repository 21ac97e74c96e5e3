"""`--from-clusters`: a `dinoseg discover` folder whose classes.yaml a person edited (clusters
renamed; two given one name to merge them; an entry deleted to drop its cluster) becomes a named
prototype head, without touching the images again."""

from __future__ import annotations

from model.errors import DinosegError
from model.storage import options_for


def from_clusters(config) -> dict:
    """The discover folder's cluster head with its edited classes.yaml: every listed cluster
    becomes a prototype of the class its entry names (entries with one name merge; a cluster
    left out of the file is dropped); classes keep the order of their first entry."""
    import torch

    from model.checkpoint import HeadCheckpoint, save_head_checkpoint
    from model.classes import ClassMap, default_color
    from model.heads import KIND, prototype_config, prototype_state
    from model.hub import load_head

    so = config.storage_options or None
    folder = config.from_clusters.rstrip("/")  # `config`: a pipeline.label.prototypes.PrototypeConfig
    loaded = load_head(f"{folder}/head.pt", storage_options=so)
    head = loaded.head
    if head.config.kind != KIND:
        raise DinosegError(f"{folder}/head.pt is a '{head.config.kind}' head, not a discover run's cluster head.")
    entries = _cluster_entries(f"{folder}/classes.yaml", len(loaded.classes), so)
    names: list[str] = []
    colors: list[tuple[int, int, int]] = []
    members: dict[str, list[int]] = {}
    for cluster, name, color in entries:
        if name not in members:
            names.append(name)
            colors.append(color or default_color(len(names)))
            members[name] = []
        members[name].append(cluster)
    # every valid prototype of a class's clusters (a discover head has one per cluster)
    vectors = {
        name: [head.prototypes[c, j] for c in members[name] for j in range(head.valid.shape[1]) if head.valid[c, j]]
        for name in names
    }
    k = max(1, max(len(v) for v in vectors.values()))
    d = head.prototypes.shape[-1]
    protos, valid = torch.zeros(len(names), k, d), torch.zeros(len(names), k, dtype=torch.bool)
    for i, name in enumerate(names):
        for j, vector in enumerate(vectors[name]):
            protos[i, j], valid[i, j] = vector, True
    classes = ClassMap(tuple(names), tuple(colors))
    temperature = config.temperature or float(head.temperature)
    ckpt = HeadCheckpoint(
        loaded.backbone,
        prototype_config(head.config.layers, head.config.embed_dim, len(names), k),
        classes,
        prototype_state(protos, valid, temperature),
        resolution=loaded.resolution,
        meta={
            "source": "clusters",
            "clusters": folder,
            "members": members,
            "backbone_weights": loaded.meta.get("backbone_weights"),
        },
    )
    save_head_checkpoint(ckpt, config.output, so)
    return {"head": config.output, "classes": names, "members": members, "from_clusters": folder}


def _cluster_entries(url: str, clusters: int, so) -> list[tuple[int, str, tuple | None]]:
    import fsspec
    import yaml

    try:
        with fsspec.open(url, "rt", **options_for(url, so)) as f:
            data = yaml.safe_load(f.read())
        entries = data["classes"]
        out = []
        for e in entries:
            cluster, name = int(e["id"]), str(e["name"]).strip()
            if not 0 <= cluster < clusters:
                raise ValueError(f"id {cluster} is not a cluster 0..{clusters - 1}")
            if not name:
                raise ValueError(f"cluster {cluster} has an empty name")
            color = tuple(int(v) for v in e["color"]) if e.get("color") else None
            out.append((cluster, name, color))
    except FileNotFoundError:
        raise DinosegError(f"{url} does not exist: pass the OUTPUT folder of `dinoseg discover`.") from None
    except (KeyError, TypeError, ValueError, yaml.YAMLError) as e:
        raise DinosegError(
            f"{url} is not a cluster class map ({e}): keep entries {{id: <cluster>, name, color}}, one per cluster kept."
        ) from None
    if len({c for c, _, _ in out}) != len(out):
        raise DinosegError(f"{url} lists a cluster twice: give each cluster one entry (one name).")
    if not out:
        raise DinosegError(f"{url} keeps no cluster: leave at least one entry.")
    return out

"""Resource defaults of the graph: keep a GPU busy, never starve the readers, never fuse decode."""

from pipeline.runtime.resources import Resources


def test_cpu_machine_defaults_leave_room_for_decoding():
    r = Resources().resolve({"CPU": 2.0})
    assert (r.actors, r.gpus_per_actor) == (1, 0)
    assert r.cpus_per_actor + r.decode_cpus <= 2.0  # the actor never takes every CPU
    assert r.cpus_per_actor != r.decode_cpus  # equal requests would fuse decoding into the actor


def test_gpu_cluster_gets_one_actor_per_gpu():
    r = Resources().resolve({"CPU": 64.0, "GPU": 8.0})
    assert (r.actors, r.gpus_per_actor, r.cpus_per_actor) == (8, 1, 1.0)
    half = Resources(gpus_per_actor=0.5).resolve({"CPU": 64.0, "GPU": 2.0})
    assert half.actors == 4


def test_equal_cpu_requests_are_separated():
    r = Resources(cpus_per_actor=1.0, decode_cpus=1.0).resolve({"CPU": 4.0})
    assert r.cpus_per_actor == 1.0 and r.decode_cpus == 0.5
    explicit = Resources(actors=3, cpus_per_actor=0.5, decode_cpus=0.25).resolve({"CPU": 2.0})
    assert (explicit.actors, explicit.cpus_per_actor, explicit.decode_cpus) == (3, 0.5, 0.25)


def test_an_autoscaling_cluster_plans_for_the_gpus_it_can_add():
    from pipeline.runtime.cluster import GPU_CEILING

    # a CPU head with GPU workers at min 0: no GPU yet, up to 8 once the autoscaler adds them
    r = Resources().resolve({"CPU": 0.0, GPU_CEILING: 8.0})
    assert (r.gpus_per_actor, r.actors, r.min_actors, r.cpus_per_actor) == (1, 8, 1, 1.0)
    # GPUs that are up decide alone, and a fixed pool uses them all from the start
    up = Resources().resolve({"CPU": 16.0, "GPU": 2.0})
    assert (up.actors, up.min_actors) == (2, 2)
    # --actors is a fixed pool even on an autoscaling cluster
    fixed = Resources(actors=3).resolve({"CPU": 0.0, GPU_CEILING: 8.0})
    assert (fixed.actors, fixed.min_actors) == (3, 3)
    # a CPU-only cluster stays on the CPU
    assert Resources().resolve({"CPU": 4.0}).gpus_per_actor == 0


def test_a_cluster_with_some_gpus_up_still_plans_for_the_rest():
    from pipeline.runtime.cluster import GPU_CEILING

    # one GPU worker left from an earlier job, up to 8: start with it, grow to 8
    r = Resources().resolve({"CPU": 8.0, "GPU": 1.0, GPU_CEILING: 8.0})
    assert (r.gpus_per_actor, r.actors, r.min_actors) == (1, 8, 1)


def test_the_gpus_a_ray_up_config_allows():
    from pathlib import Path

    import yaml

    from pipeline.runtime.cluster import launcher_gpus

    config = yaml.safe_load((Path(__file__).parents[3] / "cluster.yaml").read_text())
    assert launcher_gpus(config) == 0  # as written: `ray up` fills in the resources of each instance type
    config["available_node_types"]["gpu"]["resources"] = {"CPU": 8, "GPU": 1}  # what it fills in for g5.2xlarge
    assert launcher_gpus(config) == 8
    config["available_node_types"]["gpu"]["max_workers"] = 3
    assert launcher_gpus(config) == 3
    # two GPU types of 8 each, but the cluster's max_workers allows 4 nodes of the larger at most
    config["available_node_types"]["p4d"] = {"resources": {"GPU": 8}, "max_workers": 8, "node_config": {}}
    config["max_workers"] = 4
    assert launcher_gpus(config) == 32


def test_cluster_resources_reads_the_launcher_config_only_when_joined(ray_local, tmp_path, monkeypatch):
    import json

    from pipeline import runtime

    config = {
        "max_workers": 8,
        "head_node_type": "head",
        "available_node_types": {
            "head": {"resources": {"CPU": 0}},
            "gpu": {"resources": {"CPU": 8, "GPU": 1}, "max_workers": 8},
        },
    }
    (tmp_path / "ray_bootstrap_config.yaml").write_text(json.dumps(config))  # `ray up` writes JSON there
    monkeypatch.setattr(runtime.cluster, "LAUNCHER_CONFIG", str(tmp_path / "ray_bootstrap_config.yaml"))
    assert runtime.cluster_resources(joined=True)[runtime.GPU_CEILING] == 8
    assert runtime.GPU_CEILING not in runtime.cluster_resources(joined=False)  # an embedded Ray never grows
    (tmp_path / "ray_bootstrap_config.yaml").write_text("{not yaml: [")
    assert runtime.GPU_CEILING not in runtime.cluster_resources(joined=True)  # unreadable: plan with what is up
    monkeypatch.setattr(runtime.cluster, "LAUNCHER_CONFIG", str(tmp_path / "absent.yaml"))
    assert runtime.GPU_CEILING not in runtime.cluster_resources(joined=True)

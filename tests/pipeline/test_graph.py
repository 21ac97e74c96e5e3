"""Resource defaults of the graph: keep a GPU busy, never starve the readers, never fuse decode."""

from pipeline.graph import Resources


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
    from pipeline.graph import GPU_CEILING

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

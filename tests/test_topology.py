import pytest

from tapdist.fl.topology import Topology, TopologyError, derive_seed, sample_clients


def test_round_robin_over_all_ranks():
    topo = Topology(3, (10,) * 7)
    assert topo.host_of == (0, 1, 2, 0, 1, 2, 0)
    assert topo.clients_of(1) == (1, 4)
    assert topo.is_server(0) and not topo.is_server(1)


def test_server_without_clients():
    topo = Topology(3, (10,) * 4, server_hosts_clients=False)
    assert topo.host_ranks == (1, 2)
    assert topo.clients_of(0) == ()
    assert topo.host_of == (1, 2, 1, 2)


def test_balanced_placement_evens_out_samples():
    sizes = (100, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10)
    topo = Topology(2, sizes, placement="balanced")
    loads = [sum(sizes[c] for c in topo.clients_of(r)) for r in range(2)]
    assert sorted(loads) == [100, 100]
    assert Topology(2, sizes, placement="balanced").host_of == topo.host_of  # deterministic


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (
            dict(world_size=4, client_sizes=(5, 5)),
            ["4 client-hosting ranks", "only 2 clients", "allow_idle_ranks"],
        ),
        (
            dict(world_size=1, client_sizes=(5,), server_hosts_clients=False),
            ["no rank can host clients", "server_hosts_clients=true"],
        ),
        (dict(world_size=2, client_sizes=(5, 0)), ["clients [1] have no training samples"]),
        (dict(world_size=2, client_sizes=(5, 5), placement="random"), ["placement 'random'"]),
    ],
)
def test_invalid_layouts(kwargs, words):
    with pytest.raises(TopologyError) as err:
        Topology(**kwargs)
    for word in words:
        assert word in str(err.value)


def test_idle_ranks_when_allowed():
    topo = Topology(4, (5, 5), allow_idle_ranks=True)
    assert topo.clients_of(3) == ()


def test_sampling_depends_on_seed_and_round_only():
    first = [sample_clients(41, r, 30, 2) for r in range(50)]
    assert first == [sample_clients(41, r, 30, 2) for r in range(50)]
    assert all(len(set(s)) == 2 and s == sorted(s) for s in first)
    assert len({tuple(s) for s in first}) > 30  # rounds differ
    assert first != [sample_clients(42, r, 30, 2) for r in range(50)]
    assert sample_clients(41, 0, 5, 5) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError):
        sample_clients(41, 0, 5, 6)


def test_derived_seeds_differ_by_purpose():
    seeds = {derive_seed(41, 1, r, c) for r in range(20) for c in range(20)}
    assert len(seeds) == 400
    assert derive_seed(41, 1, 0, 0) == derive_seed(41, 1, 0, 0)

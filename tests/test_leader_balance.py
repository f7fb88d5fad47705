"""LeaderBalancer's rules (engine/cluster/leader_balance.py), on a clock of
our own: a partition moves to its preferred replica only when that one is
caught up and imbalanced beyond the percentage, soon after an election or a
rejoin, otherwise at the check interval, with a backoff after a transfer
that did not take."""
from __future__ import annotations

from raftka.cluster.leader_balance import BACKOFF_S, WATCH_PERIOD_S, LeaderBalancer, LedPartition, preferred_imbalance

ME = 1
P0, P1 = ("t", 0), ("t", 1)


def led(key, preferred=2, epoch=5, caught_up=True) -> LedPartition:
    return LedPartition(key, preferred, epoch, caught_up)


def test_imbalance_is_the_share_of_a_brokers_preferred_partitions_it_does_not_lead():
    partitions = [(1, [1, 2]), (1, [2, 1]), (2, [2, 3]), (-1, [3, 1])]
    assert preferred_imbalance(partitions) == {1: 0.0, 2: 0.5, 3: 1.0}


def test_a_partition_an_election_brought_here_moves_to_its_caught_up_preferred_replica_at_once():
    balancer = LeaderBalancer(ME, check_interval_s=300, imbalance_percentage=10)
    assert balancer.transfers(0.0, [led(P0), led(P1, preferred=ME)], {2: 0.5, ME: 0.0}) == [(P0, 2)]


def test_no_transfer_while_the_preferred_replica_is_away_then_one_soon_after_it_rejoins():
    balancer = LeaderBalancer(ME, check_interval_s=300, imbalance_percentage=10)
    assert balancer.transfers(0.0, [led(P0, caught_up=False)], {2: 1.0}) == []
    assert P0 in balancer.watching
    assert not balancer.due(WATCH_PERIOD_S / 2) and balancer.due(WATCH_PERIOD_S)
    assert balancer.transfers(WATCH_PERIOD_S, [led(P0, caught_up=True)], {2: 1.0}) == [(P0, 2)]


def test_a_broker_within_the_imbalance_percentage_keeps_its_partitions_off_the_watch():
    balancer = LeaderBalancer(ME, check_interval_s=300, imbalance_percentage=50)
    assert balancer.transfers(0.0, [led(P0)], {2: 0.5}) == []
    assert not balancer.watching
    assert balancer.transfers(299.0, [led(P0)], {2: 1.0}) == []        # checked again only at the interval
    assert balancer.transfers(300.0, [led(P0)], {2: 1.0}) == [(P0, 2)]


def test_a_transfer_that_did_not_take_is_retried_only_after_a_doubling_backoff():
    balancer = LeaderBalancer(ME, check_interval_s=300, imbalance_percentage=10)
    assert balancer.transfers(0.0, [led(P0)], {2: 1.0}) == [(P0, 2)]
    assert balancer.transfers(BACKOFF_S - 0.1, [led(P0)], {2: 1.0}) == []
    assert balancer.transfers(BACKOFF_S, [led(P0)], {2: 1.0}) == [(P0, 2)]
    assert balancer.transfers(BACKOFF_S * 2.9, [led(P0)], {2: 1.0}) == []
    assert balancer.transfers(BACKOFF_S * 3, [led(P0)], {2: 1.0}) == [(P0, 2)]


def test_losing_the_leadership_forgets_the_backoff_and_a_new_election_watches_again():
    balancer = LeaderBalancer(ME, check_interval_s=300, imbalance_percentage=10)
    assert balancer.transfers(0.0, [led(P0)], {2: 1.0}) == [(P0, 2)]
    assert balancer.transfers(1.0, [], {2: 0.0}) == []            # the transfer took
    assert balancer.transfers(2.0, [led(P0, epoch=7)], {2: 1.0}) == [(P0, 2)]   # elected here again

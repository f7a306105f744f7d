from rlhfkit.train.balance import deal_groups


def test_groups_move_from_the_most_to_the_least_loaded_rank_only_while_that_narrows_the_gap():
    # rank 0 holds 2+9+6+2 = 19, rank 1 7+5 = 12: gap 7, group 0 (2) halves it best (group 3 ties, the lower
    # goes); 17 / 14: group 3 (2); 15 / 16: rank 1 has no group under 1, so the deal stops
    assert deal_groups([2, 9, 6, 2, 7, 5], [0, 0, 0, 0, 1, 1], 2) == [[1, 2], [0, 3, 4, 5]]
    assert deal_groups([3, 3], [0, 1], 2) == [[0], [1]]  # balanced already: nothing moves
    assert deal_groups([4, 4, 4, 4], [1, 1, 1, 1], 2) == [[0, 1], [2, 3]]
    assert deal_groups([4], [1], 3) == [[], [0], []] and deal_groups([], [], 2) == [[], []]

"""Operations on a store that run its model over data: merging stores with pruning, and pruning ranks by gate mass.

They sit above `store/` (persistence only) and use evaluation and inspection to measure the model they build.
"""

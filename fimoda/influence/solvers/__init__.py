"""Solvers of A X = B for the damped operators of :mod:`fimoda.influence.operators`: conjugate
gradients (:mod:`.cg`) and LiSSA's truncated Neumann series (:mod:`.lissa`)."""

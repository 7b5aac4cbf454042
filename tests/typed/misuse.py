"""Calls mypy must refuse: the arguments do not match the function's."""

import txfiberdb


def stock_of(product_id: int) -> int:
    return product_id


txfiberdb.run_in_fiber(stock_of, "not an int")
txfiberdb.run_in_fiber(stock_of, 1, extra=1)
txfiberdb.run_blocking(stock_of)
txfiberdb.fibered(stock_of)("nope")

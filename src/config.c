/* config.c: written in a following change */

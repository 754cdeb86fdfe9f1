/* pricing.c: written in a following change */

/* store.c: written in a following change */

/* http.c: written in a following change */

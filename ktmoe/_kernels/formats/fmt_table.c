/* fmt_table.c: the format table, one row per (weight format, activation mode) pair (fmt.h);
 * each row is defined in its own fmt_<row>.c and listed once, in meson.build's fmt_rows, from which
 * meson writes KT_FORMATS (kt_formats.h). Compiled once per ISA: kt_fmt_lookup_<isa>. Adding a
 * format: design.md 5, "Adding a weight format". */
#include "layer/pass.h"
#include "kt_formats.h"
#include <stddef.h>

#define KT_DECLARE(name) extern const kt_fmt_ops KT_FN(kt_fmt_##name);
#define KT_ROW(name) &KT_FN(kt_fmt_##name),
KT_FORMATS(KT_DECLARE)
static const kt_fmt_ops *const table[] = {KT_FORMATS(KT_ROW)};

const kt_fmt_ops *KT_FN(kt_fmt_lookup)(int wformat, int act_int8) {
    for (size_t i = 0; i < sizeof table / sizeof *table; i++)
        if (table[i]->wformat == wformat && table[i]->act_int8 == (act_int8 != 0)) return table[i];
    return NULL;
}

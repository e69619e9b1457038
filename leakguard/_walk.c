/* leakguard._walk: the diagnosis's heap walk, compiled (see diagnose.py, "the walk").
 *
 * walk(starts, own, targets, max_paths, big, budget_objects, budget_seconds, max_level)
 *   -> (hits, used, complete)
 *
 * Breadth first from *starts* through each object's tp_traverse (what gc.get_referents and the
 * collector use), one level at a time, in the same order as the pure-Python walk: a level's
 * referents are checked against *targets* (built-in containers of more than *big* items last),
 * the walk ends as soon as every target is found, else the level's tracked, unseen referents make
 * the next level (objects whose id is in *own* are never entered).  *hits*: for each time a target
 * was met (at most *max_paths* per target, all from the level that first met it), a tuple
 * (target index, root index, [(object, offset of the next one among its referents), ...]).
 * *used*: objects and referents examined; *complete*: every object reachable was examined.
 *
 * Why it is safe: during the traversal no Python code runs and no Python object is allocated
 * (an allocation can start a collection, which could free an object held here borrowed); the
 * GIL is held throughout, so no other thread changes the heap.  The seen table and the levels
 * are malloc'd; the result objects are made after the traversal, once every object on a path
 * has a reference of its own (a finalizer run by a collection then cannot free it).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <time.h>
#ifdef _WIN32
#include <windows.h>
#endif

#define NONE UINT32_MAX
#define MAX_NODES (UINT32_MAX - 1)

typedef struct {
    PyObject *obj;
    uint32_t parent; /* node index of the object whose referents met it first, NONE for a root or own */
    uint32_t offset; /* its position among the parent's referents */
} Node;

typedef struct {
    uint32_t target, node, offset; /* node: the parent (or the root itself when root is set) */
    int root;
} Hit;

typedef struct {
    PyObject *key; /* NULL: empty */
    uint32_t node;
} Slot;

typedef struct {
    Node *nodes;
    size_t n, cap;
    Slot *table; /* open addressing, linear probing, at most 2/3 full */
    size_t mask, filled;
    int shift, tshift;
    /* targets */
    PyObject **targets;
    uint32_t *ttable;
    size_t tmask;
    char *remaining;
    uint32_t *count;
    Py_ssize_t ntargets, nremaining;
    Py_ssize_t max_paths;
    Hit *hits;
    size_t nhits, hcap;
    /* the object being traversed */
    uint32_t cur, off;
    int scan, expand;
    size_t used;
    int nomem;
} Walk;

/* Fibonacci hashing: the product's high bits mix all of the address (the tables take them by shift) */
static inline size_t
hash_ptr(const void *p, int shift)
{
    return (size_t)((((uint64_t)(uintptr_t)p >> 4) * 0x9E3779B97F4A7C15ULL) >> shift);
}

static int
shift_for(size_t size) /* size a power of two */
{
    int bits = 0;
    while (((size_t)1 << bits) < size)
        bits++;
    return 64 - bits;
}

static double
now(void)
{
#ifdef _WIN32
    return (double)GetTickCount64() / 1000.0;
#else
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
#endif
}

/* Room for one more item of *size* bytes in the array *items* (*cap* items), doubling it when full. */
static int
reserve(void **items, size_t n, size_t *cap, size_t size, size_t first)
{
    if (n < *cap)
        return 0;
    size_t more = *cap ? *cap * 2 : first;
    void *p = realloc(*items, more * size);
    if (p == NULL)
        return -1;
    *items = p;
    *cap = more;
    return 0;
}

static int
grow_table(Walk *w)
{
    size_t size = (w->mask + 1) * 2;
    Slot *t = calloc(size, sizeof(Slot));
    if (t == NULL)
        return -1;
    for (size_t i = 0; i <= w->mask; i++) {
        if (w->table[i].key != NULL) {
            size_t j = hash_ptr(w->table[i].key, shift_for(size));
            while (t[j].key != NULL)
                j = (j + 1) & (size - 1);
            t[j] = w->table[i];
        }
    }
    free(w->table);
    w->table = t;
    w->mask = size - 1;
    w->shift = shift_for(size);
    return 0;
}

/* Add a node for *o*; with *unique*, only when *o* is not in the table yet (returns 0 then, 1 when
 * added, -1 when out of memory). */
static int
add(Walk *w, PyObject *o, uint32_t parent, uint32_t offset, int unique)
{
    size_t j = hash_ptr(o, w->shift);
    PyObject *k;
    while ((k = w->table[j].key) != NULL) {
        if (k == o) {
            if (unique)
                return 0;
            break;
        }
        j = (j + 1) & w->mask;
    }
    if (w->n >= MAX_NODES || reserve((void **)&w->nodes, w->n, &w->cap, sizeof(Node), 1024) < 0)
        return -1;
    uint32_t idx = (uint32_t)w->n++;
    w->nodes[idx].obj = o;
    w->nodes[idx].parent = parent;
    w->nodes[idx].offset = offset;
    if (k == NULL) { /* not in the table: index it (a duplicate root keeps the first one's entry) */
        w->table[j].key = o;
        w->table[j].node = idx;
        if (3 * ++w->filled > 2 * w->mask && grow_table(w) < 0)
            return -1;
    }
    return 1;
}

static Py_ssize_t
target_of(Walk *w, PyObject *o)
{
    size_t j = hash_ptr(o, w->tshift);
    uint32_t v;
    while ((v = w->ttable[j]) != 0) {
        if (w->targets[v - 1] == o)
            return (Py_ssize_t)v - 1;
        j = (j + 1) & w->tmask;
    }
    return -1;
}

static int
hit(Walk *w, uint32_t t, uint32_t node, uint32_t offset, int root)
{
    if (w->count[t] >= (uint32_t)w->max_paths)
        return 0;
    if (reserve((void **)&w->hits, w->nhits, &w->hcap, sizeof(Hit), 64) < 0)
        return -1;
    w->hits[w->nhits++] = (Hit){t, node, offset, root};
    w->count[t]++;
    return 0;
}

/* Targets met since the last call are found: no more paths are recorded for them. */
static void
settle(Walk *w)
{
    for (Py_ssize_t t = 0; t < w->ntargets; t++) {
        if (w->remaining[t] && w->count[t]) {
            w->remaining[t] = 0;
            w->nremaining--;
        }
    }
}

static int
visit(PyObject *child, void *arg)
{
    Walk *w = (Walk *)arg;
    uint32_t off = w->off++;
    w->used++;
    if (w->scan) {
        Py_ssize_t t = target_of(w, child);
        if (t >= 0 && w->remaining[t] && hit(w, (uint32_t)t, w->cur, off, 0) < 0) {
            w->nomem = 1;
            return -1;
        }
    }
    if (w->expand && PyObject_GC_IsTracked(child) && add(w, child, w->cur, off, 1) < 0) {
        w->nomem = 1;
        return -1;
    }
    return 0;
}

static int
traverse(Walk *w, uint32_t idx, int scan, int expand)
{
    PyObject *o = w->nodes[idx].obj;
    w->used++;
    if (!PyObject_IS_GC(o) || Py_TYPE(o)->tp_traverse == NULL)
        return 0;
    w->cur = idx;
    w->off = 0;
    w->scan = scan;
    w->expand = expand;
    Py_TYPE(o)->tp_traverse(o, visit, w);
    return w->nomem ? -1 : 0;
}

static int
is_big(PyObject *o, Py_ssize_t big)
{
    if (PyList_CheckExact(o) || PyTuple_CheckExact(o))
        return Py_SIZE(o) > big;
    if (PyDict_CheckExact(o))
        return PyDict_GET_SIZE(o) > big;
    if (PyAnySet_CheckExact(o))
        return PySet_GET_SIZE(o) > big;
    return 0;
}

enum { FOUND, EXHAUSTED, STOPPED, NOMEM };

/* The walk proper: no Python object is made or freed here. */
static int
run(Walk *w, size_t first, size_t nroots, Py_ssize_t big, size_t budget, double deadline, long max_level)
{
    for (size_t i = 0; i < nroots; i++) { /* a root that is itself a target: a local holding the socket */
        Py_ssize_t t = target_of(w, w->nodes[first + i].obj);
        if (t >= 0 && hit(w, (uint32_t)t, (uint32_t)(first + i), 0, 1) < 0)
            return NOMEM;
    }
    settle(w);
    size_t lo = first, hi = first + nroots, ticks = 0;
    for (long k = 0; w->nremaining; k++) {
        if (max_level >= 0 && k >= max_level)
            return STOPPED;
        if (lo == hi)
            return EXHAUSTED;
        int bigs = 0;
        for (size_t i = lo; i < hi && !bigs; i++)
            bigs = is_big(w->nodes[i].obj, big);
        /* A level is checked first (built-in containers of more than *big* items last, each only if targets
         * remain), and read again for the next level only if targets remain after all of it: the last level,
         * often the largest, is never put in the seen table. */
        for (int pass = 0; pass < 3; pass++) {
            for (size_t i = lo; i < hi; i++) {
                if (pass < 2 && bigs && is_big(w->nodes[i].obj, big) != pass)
                    continue;
                if (pass == 1 && !bigs)
                    break;
                if (traverse(w, (uint32_t)i, pass < 2, pass == 2) < 0)
                    return NOMEM;
                if (w->used > budget || (++ticks % 1024 == 0 && now() > deadline))
                    return STOPPED;
                if (pass == 1) { /* after each big container, as the Python walk */
                    settle(w);
                    if (!w->nremaining)
                        return FOUND;
                }
            }
            if (pass == 0)
                settle(w);
            if (!w->nremaining)
                return FOUND;
        }
        lo = hi;
        hi = w->n;
    }
    return FOUND;
}

static PyObject *
build(Walk *w, size_t first)
{
    /* every object on a path gets a reference of its own before any allocation */
    for (size_t h = 0; h < w->nhits; h++)
        for (uint32_t q = w->hits[h].node; q != NONE; q = w->nodes[q].parent)
            Py_INCREF(w->nodes[q].obj);
    PyObject *out = PyList_New(0);
    for (size_t h = 0; out != NULL && h < w->nhits; h++) {
        Hit *x = &w->hits[h];
        PyObject *path = PyList_New(0);
        if (path == NULL) {
            Py_CLEAR(out);
            break;
        }
        uint32_t q = x->node, offset = x->offset;
        if (!x->root) {
            for (;;) {
                PyObject *step = Py_BuildValue("(OI)", w->nodes[q].obj, (unsigned int)offset);
                if (step == NULL || PyList_Append(path, step) < 0) {
                    Py_XDECREF(step);
                    Py_CLEAR(path);
                    break;
                }
                Py_DECREF(step);
                if (w->nodes[q].parent == NONE)
                    break;
                offset = w->nodes[q].offset;
                q = w->nodes[q].parent;
            }
        }
        PyObject *item = NULL;
        if (path != NULL && PyList_Reverse(path) == 0)
            item = Py_BuildValue("(InO)", (unsigned int)x->target, (Py_ssize_t)(q - first), path);
        Py_XDECREF(path);
        if (item == NULL || PyList_Append(out, item) < 0)
            Py_CLEAR(out);
        Py_XDECREF(item);
    }
    for (size_t h = 0; h < w->nhits; h++)
        for (uint32_t q = w->hits[h].node; q != NONE; q = w->nodes[q].parent)
            Py_DECREF(w->nodes[q].obj);
    return out;
}

static PyObject *
walk(PyObject *module, PyObject *args)
{
    PyObject *starts, *own, *targets;
    Py_ssize_t max_paths, big;
    unsigned long long budget;
    double seconds;
    long max_level;
    if (!PyArg_ParseTuple(args, "O!OO!nnKdl:walk", &PyList_Type, &starts, &own, &PyList_Type, &targets, &max_paths,
                          &big, &budget, &seconds, &max_level))
        return NULL;
    double deadline = now() + seconds;
    Walk w = {0};
    PyObject *result = NULL, *own_list = NULL;
    Py_ssize_t nt = PyList_GET_SIZE(targets);
    size_t tsize = 8;
    while (tsize < 16 * (size_t)nt) /* mostly empty: a referent that is no target is told at its first probe */
        tsize *= 2;
    w.ntargets = w.nremaining = nt;
    w.max_paths = max_paths;
    w.targets = PyMem_Malloc((nt + 1) * sizeof(PyObject *));
    w.ttable = calloc(tsize, sizeof(uint32_t));
    w.remaining = malloc(nt + 1);
    w.count = calloc(nt + 1, sizeof(uint32_t));
    w.mask = 1023;
    w.shift = shift_for(w.mask + 1);
    w.table = calloc(w.mask + 1, sizeof(Slot));
    own_list = PySequence_List(own);
    if (!w.targets || !w.ttable || !w.remaining || !w.count || !w.table || !own_list) {
        if (!PyErr_Occurred())
            PyErr_NoMemory();
        goto done;
    }
    w.tmask = tsize - 1;
    w.tshift = shift_for(tsize);
    for (Py_ssize_t i = 0; i < nt; i++) { /* a target listed twice keeps its first index */
        PyObject *o = PyList_GET_ITEM(targets, i);
        w.targets[i] = o;
        w.remaining[i] = 1;
        size_t j = hash_ptr(o, w.tshift);
        while (w.ttable[j] && w.targets[w.ttable[j] - 1] != o)
            j = (j + 1) & w.tmask;
        if (w.ttable[j] == 0)
            w.ttable[j] = (uint32_t)i + 1;
    }
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(own_list); i++) { /* ids only: never dereferenced */
        void *p = PyLong_AsVoidPtr(PyList_GET_ITEM(own_list, i));
        if (p == NULL && PyErr_Occurred())
            goto done;
        if (add(&w, (PyObject *)p, NONE, 0, 1) < 0) {
            PyErr_NoMemory();
            goto done;
        }
    }
    size_t first = w.n, nroots = (size_t)PyList_GET_SIZE(starts);
    for (size_t i = 0; i < nroots; i++) {
        if (add(&w, PyList_GET_ITEM(starts, i), NONE, 0, 0) < 0) {
            PyErr_NoMemory();
            goto done;
        }
    }
    /* From here to the end of run(): no Python object made, no Python code run. */
    int how = run(&w, first, nroots, big, (size_t)budget, deadline, max_level);
    if (how == NOMEM) {
        PyErr_NoMemory();
        goto done;
    }
    PyObject *hits = build(&w, first);
    if (hits != NULL) {
        result = Py_BuildValue("(NKO)", hits, (unsigned long long)w.used, how == EXHAUSTED ? Py_True : Py_False);
    }
done:
    Py_XDECREF(own_list);
    PyMem_Free(w.targets);
    free(w.ttable);
    free(w.remaining);
    free(w.count);
    free(w.table);
    free(w.nodes);
    free(w.hits);
    return result;
}

static PyMethodDef methods[] = {
    {"walk", walk, METH_VARARGS,
     "walk(starts, own, targets, max_paths, big, budget_objects, budget_seconds, max_level) -> (hits, used, complete)"},
    {NULL, NULL, 0, NULL},
};

/* No state at all (module or process): any interpreter may load it.  A free-threaded build runs
 * other threads during a walk that holds objects borrowed: it refuses there (the pure-Python walk
 * runs instead). */
static int
exec_module(PyObject *mod)
{
    (void)mod;
#ifdef Py_GIL_DISABLED
    PyErr_SetString(PyExc_ImportError, "leakguard._walk is not built for free-threaded Python");
    return -1;
#else
    return 0;
#endif
}

static PyModuleDef_Slot slots[] = {
    {Py_mod_exec, (void *)exec_module},
#ifdef Py_mod_multiple_interpreters
    {Py_mod_multiple_interpreters, Py_MOD_PER_INTERPRETER_GIL_SUPPORTED},
#endif
#ifdef Py_mod_gil
    {Py_mod_gil, Py_MOD_GIL_NOT_USED}, /* true of what runs: exec_module refuses there */
#endif
    {0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "leakguard._walk", NULL, 0, methods, slots};

PyMODINIT_FUNC
PyInit__walk(void)
{
    return PyModuleDef_Init(&module);
}

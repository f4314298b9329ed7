/*
 * libreplfs-fsid.so: gives NFS-Ganesha a stable filesystem id for
 * fuse.replfs mounts.
 *
 * Why: Ganesha's VFS backend puts the filesystem id into every NFS file
 * handle.  It takes the id from statfs(2)'s f_fsid, and where that is zero
 * -- as it always is on FUSE -- from the mount's device number.  A FUSE
 * mount's device number is an anonymous one the kernel hands out at mount
 * time: it can change at every remount and differs between the two nodes,
 * so every handle a client holds would go stale after a remount or a
 * failover.  Loaded into Ganesha (LD_PRELOAD, set by replfsadm nfs and by
 * the systemd drop-in), this library answers statfs() for a fuse.replfs
 * mount listed in the file named by $REPLFS_NFS_FSIDS with the fsid listed
 * there, which replfsadm derives from the volume's UUID: the same on both
 * nodes and across remounts.  Every other call and path passes through
 * untouched.
 *
 * The file has one line per mount: "<mountpoint>\t<hex 32 bits>\t<hex 32 bits>".
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/vfs.h>

#define FUSE_SUPER_MAGIC 0x65735546

static int lookup(const char *path, unsigned int *hi, unsigned int *lo)
{
	const char *list = getenv("REPLFS_NFS_FSIDS");
	char real[PATH_MAX], line[PATH_MAX + 64];
	FILE *f;
	int found = 0;

	if (list == NULL || realpath(path, real) == NULL)
		return 0;
	f = fopen(list, "re");
	if (f == NULL)
		return 0;
	while (!found && fgets(line, sizeof(line), f) != NULL) {
		char *tab = strchr(line, '\t');
		unsigned int a, b;

		if (tab == NULL)
			continue;
		*tab = '\0';
		if (strcmp(line, real) == 0 && sscanf(tab + 1, "%x\t%x", &a, &b) == 2) {
			*hi = a;
			*lo = b;
			found = 1;
		}
	}
	fclose(f);
	return found;
}

static void fix(const char *path, struct statfs *buf)
{
	unsigned int hi, lo;

	if (buf->f_type != FUSE_SUPER_MAGIC)
		return;
	if (buf->f_fsid.__val[0] != 0 || buf->f_fsid.__val[1] != 0)
		return;
	if (lookup(path, &hi, &lo)) {
		buf->f_fsid.__val[0] = (int)hi;
		buf->f_fsid.__val[1] = (int)lo;
	}
}

int statfs(const char *path, struct statfs *buf)
{
	static int (*real_statfs)(const char *, struct statfs *);
	int rc;

	if (real_statfs == NULL)
		real_statfs = (int (*)(const char *, struct statfs *))dlsym(RTLD_NEXT, "statfs");
	rc = real_statfs(path, buf);
	if (rc == 0)
		fix(path, buf);
	return rc;
}

/* Ganesha is built with 64-bit file offsets and calls statfs64; on 64-bit
 * Linux the two structures are the same. */
int statfs64(const char *path, struct statfs64 *buf)
{
	static int (*real_statfs64)(const char *, struct statfs64 *);
	int rc;

	if (real_statfs64 == NULL)
		real_statfs64 = (int (*)(const char *, struct statfs64 *))dlsym(RTLD_NEXT, "statfs64");
	rc = real_statfs64(path, buf);
	if (rc == 0 && sizeof(struct statfs64) == sizeof(struct statfs))
		fix(path, (struct statfs *)buf);
	return rc;
}

# podflare-hostd on every Nomad client that can run it: a system job (one
# allocation per node), placed behind scripts/deploy/nginx-podflare.conf.
#
# Why Nomad's raw_exec rather than a container: hostd is one binary that
# needs the host itself (/dev/kvm, vm.max_map_count, its open-file limit,
# the kernel, images and template snapshots in /var/lib/podflare), and it
# isolates its guests on its own (KVM, a seccomp filter per thread). A
# container would have to be privileged and see all of that anyway, and
# there would be an image to build and ship; raw_exec runs the installed
# binary on the host's network, so the address it binds is the node's own
# and is what clients reach as `endpoint`.
#
# Each client node, once:
#   - scripts/setup (kernel, agent, images in /var/lib/podflare; the
#     template snapshots are built by hostd's first start there), then
#     install -m 0755 target/release/podflare-hostd /usr/local/bin/
#     (do not also run the systemd unit of scripts/deploy on that node);
#   - enable raw_exec in the client's agent configuration:
#       plugin "raw_exec" { config { enabled = true } }
#   - opt the node in with client meta:  client { meta { podflare_hostd = "true" } }
# The API keys, once for the whole set (a Nomad Variable this job may read):
#   nomad var put nomad/jobs/podflare-hostd api_keys=KEY1,KEY2
# Then: nomad job run scripts/deploy/podflare-hostd.nomad.hcl
# and list the nodes' addresses (port 7070) in the nginx upstream block.

job "podflare-hostd" {
  type        = "system"
  datacenters = ["*"]

  # Only Linux nodes that said they have KVM and the cache.
  constraint {
    attribute = "${attr.kernel.name}"
    value     = "linux"
  }
  constraint {
    attribute = "${meta.podflare_hostd}"
    value     = "true"
  }

  # One node at a time: restarting hostd destroys that node's sandboxes.
  update {
    max_parallel = 1
    stagger      = "30s"
  }

  group "hostd" {
    network {
      # The host's network (raw_exec has no other): a static port, so the
      # balancer's list of hosts stays the same across restarts.
      port "http" {
        static = 7070
      }
    }

    # A crash loses that node's sandboxes; restart in place. (Exit status 2
    # is a refused configuration, which restarting does not fix: see the
    # task's log.)
    restart {
      attempts = 3
      interval = "10m"
      delay    = "15s"
      mode     = "delay"
    }

    task "hostd" {
      driver = "raw_exec"

      config {
        command = "/usr/local/bin/podflare-hostd"
      }

      env {
        # The node's address and the static port.
        PODFLARE_HOSTD_ADDR = "${NOMAD_ADDR_http}"
        # Both set: every create answers `region` and `endpoint`, and the SDK
        # sends that sandbox's later calls straight to this node.
        PODFLARE_PUBLIC_URL = "http://${NOMAD_ADDR_http}"
        PODFLARE_REGION     = "${node.unique.name}"
        PODFLARE_CACHE      = "/var/lib/podflare"
        PODFLARE_LOG_FORMAT = "json"
        # Below the memory given in `resources`: guest RAM is hostd's own.
        PODFLARE_MAX_GUEST_MEMORY_MIB = "15360"
      }

      # Keys from the Nomad Variable above, never in the job file. A
      # non-loopback address without keys makes hostd refuse to start
      # (exit status 2), so a missing variable is loud, not an open host.
      template {
        destination = "secrets/hostd.env"
        env         = true
        change_mode = "restart"
        data        = <<-EOT
          {{- with nomadVar "nomad/jobs/podflare-hostd" -}}
          PODFLARE_API_KEYS={{ .api_keys }}
          {{- end }}
        EOT
      }

      # SIGTERM: hostd ends open exec streams (exit 137), destroys its
      # sandboxes and exits within 15 s.
      kill_signal  = "SIGTERM"
      kill_timeout = "30s"

      resources {
        cpu = 1000
        # Guest RAM lives in hostd's process: reserve what its admission
        # limit (PODFLARE_MAX_GUEST_MEMORY_MIB) lets guests use, plus room for
        # hostd itself, so the scheduler does not place other work into it.
        memory = 16384
      }

      service {
        name     = "podflare-hostd"
        port     = "http"
        provider = "nomad"

        check {
          type     = "http"
          path     = "/v1/healthz"
          interval = "10s"
          timeout  = "2s"
        }
      }
    }
  }
}

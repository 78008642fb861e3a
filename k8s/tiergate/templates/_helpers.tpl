{{/* Names and labels. */}}
{{- define "tiergate.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "tiergate.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "tiergate.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
app.kubernetes.io/name: {{ include "tiergate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "tiergate.selector" -}}
app.kubernetes.io/name: {{ include "tiergate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "tiergate.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "tiergate.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "tiergate.modelClaim" -}}
{{- default (printf "%s-models" (include "tiergate.fullname" .)) .Values.modelCache.existingClaim -}}
{{- end -}}

{{- define "tiergate.image" -}}
{{- $img := .image -}}
{{- printf "%s:%s" $img.repository (toString $img.tag) -}}
{{- end -}}

{{/* A tier with engineDefaults filled in where the tier is silent. */}}
{{- define "tiergate.engine" -}}
{{- $e := merge (deepCopy .tier) (deepCopy .root.Values.engineDefaults) -}}
{{- $_ := set $e "image" (merge (deepCopy (default dict .tier.image)) (deepCopy .root.Values.image)) -}}
{{- toYaml $e -}}
{{- end -}}

{{/* vLLM engine args (vLLM's own names) as command-line flags, one per list item. */}}
{{- define "tiergate.engineFlags" -}}
{{- range $k, $v := . }}
{{- $flag := printf "--%s" (replace "_" "-" $k) }}
{{- if kindIs "bool" $v }}
{{- if $v }}
- {{ $flag | quote }}
{{- else }}
- {{ printf "--no-%s" (replace "_" "-" $k) | quote }}
{{- end }}
{{- else if kindIs "map" $v }}
- {{ $flag | quote }}
- {{ toJson $v | quote }}
{{- else if kindIs "slice" $v }}
- {{ $flag | quote }}
{{- range $v }}
- {{ toString . | quote }}
{{- end }}
{{- else if not (kindIs "invalid" $v) }}
- {{ $flag | quote }}
- {{ toString $v | quote }}
{{- end }}
{{- end }}
{{- end -}}

{{/*
Refuse a tier whose model cannot fit its GPUs: the same arithmetic as models/memory.py
(weights + peak activations + overhead out of memory x gpu_memory_utilization, the
rest for KV cache, which must hold one max_model_len sequence).
*/}}
{{- define "tiergate.fitCheck" -}}
{{- $root := .root -}}
{{- $t := .tier -}}
{{- $count := int (default 0 $t.gpu.count) -}}
{{- if and (gt $count 0) $t.spec -}}
{{- $s := index $root.Values.modelSpecs $t.spec -}}
{{- if not $s }}{{ fail (printf "tiers[%s].spec: %q is not a key of modelSpecs" $t.name $t.spec) }}{{ end -}}
{{- $g := index $root.Values.gpuProfiles $t.gpu.profile -}}
{{- if not $g }}{{ fail (printf "tiers[%s].gpu.profile: %q is not a key of gpuProfiles" $t.name $t.gpu.profile) }}{{ end -}}
{{- $a := $t.engineArgs -}}
{{- if not $a.max_model_len }}{{ fail (printf "tiers[%s].engineArgs.max_model_len: required for the fit check" $t.name) }}{{ end -}}
{{- $tp := float64 (default 1 $a.tensor_parallel_size) -}}
{{- $pp := float64 (default 1 $a.pipeline_parallel_size) -}}
{{- $L := float64 $s.layers -}}{{- $H := float64 $s.hidden -}}{{- $nh := float64 $s.heads -}}
{{- $kv := float64 $s.kvHeads -}}{{- $hd := float64 $s.headDim -}}
{{- $I := float64 $s.intermediate -}}{{- $V := float64 $s.vocab -}}
{{- $linear := mulf $L (addf (mulf $H $nh $hd) (mulf 2 $H $kv $hd) (mulf $nh $hd $H) (mulf 3 $H $I)) -}}
{{- $other := addf (mulf $V $H (ternary 1 2 (default false $s.tiedEmbeddings))) (mulf (addf (mulf 2 $L) 1) $H) -}}
{{- $q := default (default "none" $t.weightsQuantization) $a.quantization -}}
{{- $bpwTable := dict "none" 2.0 "fp8" 1.0 "int8" 1.0 "compressed-tensors" 1.0 "awq" 0.51953125 "awq_marlin" 0.51953125 "gptq" 0.51953125 "gptq_marlin" 0.51953125 "bitsandbytes" 0.5625 -}}
{{- if not (hasKey $bpwTable $q) }}{{ fail (printf "tiers[%s].engineArgs.quantization: %q is not one of %s" $t.name $q (keys $bpwTable | sortAlpha | join ", ")) }}{{ end -}}
{{- $weights := addf (mulf $linear (get $bpwTable $q)) (mulf $other 2) -}}
{{- $perGpu := divf $weights (mulf $tp $pp) -}}
{{- $kvb := ternary 1.0 2.0 (hasPrefix "fp8" (toString (default "auto" $a.kv_cache_dtype))) -}}
{{- $kvHeads := maxf 1.0 (floor (divf $kv $tp)) -}}
{{- $kvTok := mulf 2 (divf $L $pp) $kvHeads $hd $kvb -}}
{{- $mml := float64 $a.max_model_len -}}
{{- $batched := float64 (default 8192 $a.max_num_batched_tokens) -}}
{{- $seqs := float64 (default 256 $a.max_num_seqs) -}}
{{- $act := addf (mulf $batched (addf (mulf 4 $H) (divf (mulf 2 $I) $tp)) 2) (divf (mulf (minf $seqs $batched) $V 4) $tp) -}}
{{- $gib := 1073741824.0 -}}
{{- $util := float64 (default 0.9 $a.gpu_memory_utilization) -}}
{{- $overhead := mulf (default 1.0 $root.Values.engineDefaults.gpuMemoryOverheadGiB) $gib -}}
{{- $budget := subf (mulf $g.memoryGiB $gib $util) $perGpu $act $overhead -}}
{{- $need := mulf $mml $kvTok -}}
{{- if lt $budget $need -}}
{{- fail (printf "tiers[%s]: %s (%s) does not fit on %d x %s at gpu_memory_utilization %.2f: weights %.2f GiB per GPU leave %.2f GiB for the KV cache, but one %d-token sequence needs %.2f GiB; short by %.2f GiB per GPU (raise tensor_parallel_size, quantize, or lower max_model_len)" $t.name $t.spec $q $count $t.gpu.profile $util (divf $perGpu $gib) (divf $budget $gib) (int $mml) (divf $need $gib) (divf (subf $need $budget) $gib)) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Pod-level pieces shared by engine pods (head, single-node, and Ray workers). */}}
{{- define "tiergate.engineVolumes" -}}
- name: models
  persistentVolumeClaim:
    claimName: {{ include "tiergate.modelClaim" .root }}
- name: shm
  emptyDir:
    medium: Memory
    sizeLimit: {{ .engine.shmSize }}
- name: tmp
  emptyDir: {}
{{- end -}}

{{- define "tiergate.engineMounts" -}}
- {name: models, mountPath: /models}
- {name: shm, mountPath: /dev/shm}
- {name: tmp, mountPath: /tmp}
{{- end -}}

{{- define "tiergate.engineEnv" -}}
- {name: HOME, value: /tmp}
- {name: XDG_CACHE_HOME, value: /tmp/.cache}
- {name: HF_HOME, value: /models/huggingface}
- {name: VLLM_NO_USAGE_STATS, value: "1"}
{{- if .root.Values.huggingface.tokenSecret }}
- name: HF_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ .root.Values.huggingface.tokenSecret }}
      key: {{ .root.Values.huggingface.tokenKey }}
{{- end }}
{{- range $k, $v := .engine.env }}
- name: {{ $k }}
  value: {{ toString $v | quote }}
{{- end }}
{{- end -}}

{{- define "tiergate.enginePodSpec" -}}
{{- $e := .engine -}}
serviceAccountName: {{ include "tiergate.serviceAccountName" .root }}
automountServiceAccountToken: false
{{- with .root.Values.imagePullSecrets }}
imagePullSecrets: {{- toYaml . | nindent 2 }}
{{- end }}
securityContext: {{- toYaml .root.Values.podSecurityContext | nindent 2 }}
{{- if $e.runtimeClassName }}
runtimeClassName: {{ $e.runtimeClassName }}
{{- end }}
{{- with $e.nodeSelector }}
nodeSelector: {{- toYaml . | nindent 2 }}
{{- end }}
{{- if gt (int (default 0 $e.gpu.count)) 0 }}
{{- with $e.tolerations }}
tolerations: {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}
{{- with $e.affinity }}
affinity: {{- toYaml . | nindent 2 }}
{{- end }}
terminationGracePeriodSeconds: 60
volumes: {{- include "tiergate.engineVolumes" . | nindent 2 }}
{{- end -}}

{{- define "tiergate.engineResources" -}}
{{- $e := .engine -}}
{{- $r := deepCopy (default dict $e.resources) -}}
{{- $count := int (default 0 $e.gpu.count) -}}
{{- if gt $count 0 -}}
{{- $limits := default dict $r.limits -}}
{{- $_ := set $limits $e.gpuResourceName $count -}}
{{- $_ := set $r "limits" $limits -}}
{{- end -}}
{{- toYaml $r -}}
{{- end -}}

{{/* The engine's KV-event port when tiergate configures its publisher, else nothing:
     off, or the tier's engineArgs configure kv_events_config themselves. */}}
{{- define "tiergate.kvEvents" -}}
{{- $kv := default dict .engine.kvEvents -}}
{{- $cacheOff := and (hasKey .args "enable_prefix_caching") (not .args.enable_prefix_caching) -}}
{{- if and $kv.enabled (not (hasKey .args "kv_events_config")) (not $cacheOff) }}
port: {{ int (default 5557 $kv.port) }}
{{- end }}
{{- end -}}
